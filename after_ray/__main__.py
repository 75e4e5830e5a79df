from after_ray.cli import main

raise SystemExit(main())
