"""The environment crossdock runs in during the tests: no proxies (traffic stays on loopback) and
no ambient credentials (an empty $DOCKER_CONFIG, no $REGISTRY_AUTH_FILE)."""

import os
import shutil
import tempfile

_EMPTY_DOCKER_CONFIG = None


def base_env(**extra):
    """os.environ without proxies and credentials; `extra` sets (or, with None, removes) keys."""
    global _EMPTY_DOCKER_CONFIG
    if _EMPTY_DOCKER_CONFIG is None:
        _EMPTY_DOCKER_CONFIG = tempfile.mkdtemp(prefix="crossdock-nodockercfg-")
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["DOCKER_CONFIG"] = _EMPTY_DOCKER_CONFIG
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def remove_empty_docker_config():
    """Removes the empty $DOCKER_CONFIG directory (at the end of a test module)."""
    global _EMPTY_DOCKER_CONFIG
    if _EMPTY_DOCKER_CONFIG:
        shutil.rmtree(_EMPTY_DOCKER_CONFIG, ignore_errors=True)
        _EMPTY_DOCKER_CONFIG = None
