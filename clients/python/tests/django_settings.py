"""Django settings for the backend's conformance suite (the cache itself is
configured per test against the suite's real cache-api)."""

SECRET_KEY = "herald-python-client-tests"
USE_TZ = True
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
