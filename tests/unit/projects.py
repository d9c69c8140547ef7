"""A throw-away project for the tests: config/deployment.yml and the environment's secrets
file in a temporary directory, with secrets that are awkward on purpose."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from togather_tasks.config import Settings, load_settings

COMPAT_DIR = Path(__file__).resolve().parents[3] / "shared" / "compat"

# A password with every character that needs URL-encoding in a postgres URL.
DB_PASSWORD = "p@ss:w%rd/s3cr3t"
DB_URL = (f"postgres://togather_app:{quote(DB_PASSWORD, safe='')}@db.internal:5433/"
          "togather_staging?sslmode=require")
JWT_SECRET = "jwt-5ecret-value-0123456789"
ADMIN_API_KEY = "admin-key-abcdef-987654"

# The unit tests of the site configuration, reloads and commands read nginx's text: the base
# project pins that engine (test_haproxy and the tests of the default switch it per test).
BASE_CONFIG = """\
app:
  name: togather-test
proxy:
  engine: nginx
build:
  dockerfile: app/Dockerfile
environments:
  staging:
    hosts: [deploy@staging.example.com:2222]
    remote_dir: /srv/togather/staging
    ports: {proxy: 9080, blue: 9081, green: 9082}
  production:
    hosts: [deploy@prod.example.com]
"""


def env_text(env: str, **overrides: str | None) -> str:
    """A valid secrets file for `env`; an override of None drops that variable."""
    values: dict[str, str | None] = {
        "ENVIRONMENT": env,
        "DATABASE_URL": DB_URL,
        "JWT_SECRET": JWT_SECRET,
        "ADMIN_API_KEY": ADMIN_API_KEY,
        **overrides,
    }
    return "".join(f"{k}='{v}'\n" for k, v in values.items() if v is not None)


@dataclass
class Project:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config" / "deployment.yml"

    def env_path(self, env: str) -> Path:
        return self.root / "config" / "environments" / f".env.{env}"

    def write_config(self, text: str = BASE_CONFIG) -> Path:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(text, encoding="utf-8")
        return self.config_path

    def write_env(self, env: str, text: str | None = None, *, mode: int = 0o600,
                  **overrides: str | None) -> Path:
        path = self.env_path(env)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(env_text(env, **overrides) if text is None else text, encoding="utf-8")
        path.chmod(mode)
        return path

    def load(self, env: str = "staging", **kwargs: bool) -> Settings:
        return load_settings(env, self.root, **kwargs)
