"""The driver configuration file: defaults, sizes, merging of fetch defaults, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi.config import ConfigError, config_from_dict, load_config, parse_size

MINIMAL = {"repositories": [{"name": "models", "urls": ["https://repo.example/models/"]}]}


def test_minimal_defaults() -> None:
    cfg = config_from_dict(MINIMAL)
    assert cfg.default_repository == "models"
    assert cfg.repository(None).name == "models"
    assert cfg.repository("models").urls == ("https://repo.example/models/",)
    assert cfg.store.path == Path("/var/lib/composefs-csi/store")
    assert cfg.store.size_cap is None
    with pytest.raises(KeyError):
        cfg.repository("other")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1024, 1024), ("10Gi", 10 << 30), ("1.5Ki", 1536), ("500M", 500 * 10**6), ("7", 7)],
)
def test_sizes(value: object, expected: int) -> None:
    assert parse_size(value, "k") == expected


@pytest.mark.parametrize("value", ["ten", "10Qi", -1, True, 1.5])
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ConfigError, match="k:"):
        parse_size(value, "k")


def test_fetch_defaults_apply_and_repositories_override() -> None:
    cfg = config_from_dict(
        {
            "repositories": [
                {"name": "a", "urls": ["https://a.example/"]},
                {
                    "name": "b",
                    "urls": ["https://b.example/"],
                    "concurrency": 4,
                    "processes": 0,
                    "timeouts": {"read": 5},
                },
            ],
            "default_repository": "b",
            "fetch": {
                "concurrency": 32,
                "processes": 3,
                "timeouts": {"connect": 3, "read": 60},
                "rpc_wait": 50,
            },
            "store": {"size_cap": "2Gi", "high_watermark": 0.95, "low_watermark": 0.5},
        }
    )
    assert cfg.repository("a").concurrency == 32
    assert cfg.repository("b").concurrency == 4
    assert (cfg.repository("a").processes, cfg.repository("b").processes) == (3, 0)
    assert cfg.repository("b").timeouts.connect == 3
    assert cfg.repository("b").timeouts.read == 5
    assert cfg.repository(None).name == "b"
    assert cfg.store.size_cap == 2 << 30
    assert cfg.rpc_wait == 50


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "at least one repository"),
        ({"repositories": []}, "at least one repository"),
        ({**MINIMAL, "stor": {}}, "unknown key"),
        ({**MINIMAL, "store": {"pth": "/x"}}, "store: unknown key"),
        ({**MINIMAL, "default_repository": "nope"}, "not a configured repository"),
        ({"repositories": [{"name": "a", "urls": ["http://plain.example/"]}]}, "plain http"),
        ({"repositories": [{"name": "a"}]}, "URL"),
        (
            {"repositories": [MINIMAL["repositories"][0], MINIMAL["repositories"][0]]},
            "duplicate",
        ),
        ({**MINIMAL, "store": {"high_watermark": 0.5, "low_watermark": 0.6}}, "below"),
        ({**MINIMAL, "dataplane": {"read_ahead_kb": "lots"}}, "expected a number"),
        ("just text", "expected a mapping"),
    ],
)
def test_invalid(doc: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(doc)


def test_load_file(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("repositories:\n  - name: r\n    urls: [/srv/repo]\n")
    assert load_config(p).repository("r").urls == ("/srv/repo",)
    p.write_text("repositories: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_dataplane_mount_options() -> None:
    cfg = config_from_dict({**MINIMAL, "dataplane": {"mount_options": ["ro", "nodev"]}})
    assert cfg.dataplane.mount_options == ("ro", "nodev")
    assert "allow_other" in config_from_dict(MINIMAL).dataplane.mount_options
    with pytest.raises(ConfigError, match="read-only"):
        config_from_dict({**MINIMAL, "dataplane": {"mount_options": ["rw"]}})
    with pytest.raises(ConfigError, match="list of option strings"):
        config_from_dict({**MINIMAL, "dataplane": {"mount_options": "ro"}})
