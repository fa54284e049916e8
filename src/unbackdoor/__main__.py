from unbackdoor.cli.main import main

raise SystemExit(main())
