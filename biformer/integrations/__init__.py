"""BRA inside other projects' models. Each integration is an optional extra, imported only on its own:
`biformer.integrations.ultralytics` (YOLO) needs `pip install "biformer[ultralytics]"`."""
