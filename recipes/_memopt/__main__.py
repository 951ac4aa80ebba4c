from memopt.recipes.cli import main
raise SystemExit(main())
