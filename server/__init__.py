"""The llmgrpc server: gRPC services, the model registry and the engine manager."""
