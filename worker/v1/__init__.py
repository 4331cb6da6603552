"""Generated from protos/llmgrpc/worker/v1 by protos/generate.py; do not edit."""
