from fracfx.cli import main

raise SystemExit(main())
