from distributed_mtml.cli import main

raise SystemExit(main())
