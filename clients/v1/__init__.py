"""Generated from protos/llmgrpc/v1 by protos/generate.py; do not edit."""
