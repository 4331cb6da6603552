"""The worker process: one per launched model replica, running its engine (``service``), with
the worker's half of the Generate socket (``generate_socket``) and the socket's protocol
(``frames``); ``v1`` holds the stubs of the server's private API to it. ``python -m
llmgrpc.worker`` is its entry point."""
