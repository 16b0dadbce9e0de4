"""The core: `Limiter` (rules and a backend, decided with or without a request)."""
