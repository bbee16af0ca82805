"""The gRPC front end of the engine (``loraplex.v1.InferenceService``, health, reflection)."""
