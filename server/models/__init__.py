"""The launched models, by concern: the table of them (``table``), the checks and placement
that admit a launch (``admission``), their lifecycle (``lifecycle``), the calls routed to their
workers (``routing``) and weight downloads (``downloads``). ``llmgrpc.server.manager``'s
``EngineManager`` is the facade the servicers use."""
