"""Generated from protos/llmgrpc/kserve/v2 by protos/generate.py; do not edit."""
