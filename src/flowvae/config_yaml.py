"""Reading a config file: safe YAML, a regular file of bounded size, one-line errors."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from flowvae.config import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases (which let a tiny file expand into a huge one) and
    without repeated keys (which YAML silently resolves to the last one)."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not allowed in a flowvae config")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping, or a one-line :class:`ConfigError` for anything else.

    Only a regular file of at most :data:`MAX_CONFIG_BYTES` is read (not a FIFO, which would wait
    forever, nor ``/dev/zero`` or ``/dev/urandom``, which never end)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory")
    try:
        info = path.stat()
        mode, size = info.st_mode, info.st_size
        if not stat.S_ISREG(mode):
            raise ConfigError(f"config file {path} is not a regular file")
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {path} is {size / 2**20:.1f} MiB; a flowvae config is a small "
                f"YAML file (at most {MAX_CONFIG_BYTES // 2**20} MiB)"
            )
        with open(path, "rb") as f:  # read at most one byte past the limit, should the file grow meanwhile
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
        text = data.decode("utf-8")
        values = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (UnicodeDecodeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise ConfigError(f"config file {path}: {err}") from None
        raise ConfigError(f"config file {path} is not a text file") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return values
