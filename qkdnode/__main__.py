from qkdnode.cli import main

raise SystemExit(main())
