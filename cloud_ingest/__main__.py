from cloud_ingest.cli import main

raise SystemExit(main())
