from services.agent.app import main

main()
