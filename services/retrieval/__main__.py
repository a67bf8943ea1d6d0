from services.retrieval.app import main

main()
