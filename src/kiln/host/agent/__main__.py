from kiln.host.agent.main import main

raise SystemExit(main())
