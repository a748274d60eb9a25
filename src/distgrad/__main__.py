from distgrad.cli import main

raise SystemExit(main())
