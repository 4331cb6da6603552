"""Generated from protos/llmgrpc/tgis/v1 by protos/generate.py; do not edit."""
