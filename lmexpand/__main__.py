from lmexpand.cli import main

raise SystemExit(main())
