from services.finetune.app import main

main()
