"""The GCS and Azure options (``gcs_*``, ``azure_*``), how URIs name objects and accounts, and
what an answer means, with no server (the emulator tests are integration_tests/test_gcs_source.py
and test_azure_source.py)."""

from __future__ import annotations

import argparse
import errno

import pytest

from loader_plugins import StreamerConfig
from loader_plugins.cli_options import add_config_flags, config_from_args
from loader_plugins.core.sources.base import registered_storages, scheme_of, storage_for
from loader_plugins.errors import ConfigError, SourceChangedError, SourceError, SourceNotFoundError

KEY = "Zm9vYmFyLWtleS0wMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA="


@pytest.fixture(autouse=True)
def _no_cloud_environment(monkeypatch):
    """The credential chains read AZURE_STORAGE_* and friends: none from the caller's shell."""
    import os

    for name in list(os.environ):
        if name.startswith(("AZURE_", "GOOGLE_")) or name == "STORAGE_EMULATOR_HOST":
            monkeypatch.delenv(name)


def test_keys_are_validated():
    with pytest.raises(ConfigError, match="gcs_endpoint_url.*http:// or https:// URL"):
        StreamerConfig(gcs_endpoint_url="storage.googleapis.com")
    with pytest.raises(ConfigError, match="azure_account_url.*http:// or https:// URL"):
        StreamerConfig(azure_account_url="acct.blob.core.windows.net")
    with pytest.raises(ConfigError, match="gcs_anonymous.*cannot be combined with gcs_credentials_file"):
        StreamerConfig(gcs_anonymous=True, gcs_credentials_file="/k.json")
    with pytest.raises(ConfigError, match="gcs_anonymous.*expected true or false"):
        StreamerConfig.from_dict({"gcs_anonymous": "maybe"})
    with pytest.raises(ConfigError, match="azure_account_key, azure_sas_token are all set") as info:
        StreamerConfig(azure_account_key="K3Y", azure_sas_token="sv=1&sig=S1G")
    assert "K3Y" not in str(info.value) and "S1G" not in str(info.value)
    cfg = StreamerConfig.from_dict({"gcs_anonymous": "true", "gcs_endpoint_url": "none", "azure_account_url": "null"})
    assert cfg.gcs_anonymous is True and cfg.gcs_endpoint_url is None and cfg.azure_account_url is None


def test_secrets_never_shown():
    cfg = StreamerConfig(azure_connection_string=f"AccountName=a;AccountKey={KEY}")
    assert KEY not in repr(cfg)
    assert cfg.to_dict(redact=True)["azure_connection_string"] == "***"
    assert cfg.to_dict()["azure_connection_string"].endswith(KEY)     # unredacted only when asked
    for key in ("azure_account_key", "azure_sas_token"):
        assert StreamerConfig(**{key: "s3cr3t"}).to_dict(redact=True)[key] == "***"
        assert "s3cr3t" not in repr(StreamerConfig(**{key: "s3cr3t"}))


def test_cli_flags_reach_the_keys():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--gcs-endpoint-url", "http://127.0.0.1:9", "--gcs-anonymous", "true",
                              "--azure-account-name", "acct"])
    cfg = config_from_args(args)
    assert (cfg.gcs_endpoint_url, cfg.gcs_anonymous, cfg.azure_account_name) == ("http://127.0.0.1:9", True, "acct")
    assert "--azure-sas-token" in parser.format_help()


def test_schemes_are_registered_lazily():
    view = registered_storages()
    # the cache plugs its tiers in front of every object store (loader_plugins.cache.plugin) ...
    assert view["gs"] == "loader_plugins.cache.tiered:gs_storage"
    assert view["az"] == view["https"] == "loader_plugins.cache.tiered:az_storage"
    assert scheme_of("gs://b/o") == "gs" and scheme_of("https://a.blob.core.windows.net/c/b") == "https"
    # ... which are the core's plain storages when no tier is configured (no client made yet)
    from loader_plugins.core.sources.azure import AzureStorage
    from loader_plugins.core.sources.gcs import GcsStorage

    assert type(storage_for("gs://b/o", StreamerConfig())) is GcsStorage
    assert type(storage_for("az://c/b", StreamerConfig())) is AzureStorage


def test_gcs_uris():
    from loader_plugins.core.sources.gcs import parse_gs_uri

    assert parse_gs_uri("gs://bucket/some/name.safetensors") == ("bucket", "some/name.safetensors")
    assert parse_gs_uri("gs://bucket") == ("bucket", "")
    with pytest.raises(SourceError, match="no bucket name"):
        parse_gs_uri("gs:///x")


def test_azure_accounts_from_config_and_environment():
    from loader_plugins.core.sources.azure import parse_azure_uri
    from loader_plugins.core.sources.azure_client import default_account

    # nothing names an account
    with pytest.raises(SourceError, match="no storage account for az:// URIs"):
        parse_azure_uri("az://c/b", StreamerConfig())
    assert default_account(StreamerConfig(), env={}) is None
    # a connection string: its endpoint and key
    cs = f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};" \
         f"BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    account = default_account(StreamerConfig(azure_connection_string=cs), env={})
    assert (account.name, account.endpoint, account.found_in) == ("devstoreaccount1", "http://127.0.0.1:10000/"
                                                                  "devstoreaccount1", "azure_connection_string")
    assert account.credential == {"account_name": "devstoreaccount1", "account_key": KEY}
    assert KEY not in repr(account) and KEY not in account.key()
    # the environment's chain: name + SAS before the key; an explicit key wins over both
    env = {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_SAS_TOKEN": "?sv=1&sig=x",
           "AZURE_STORAGE_ACCOUNT_KEY": KEY}
    account = default_account(StreamerConfig(), env=env)
    assert (account.url, account.credential, account.found_in) == ("https://acct.blob.core.windows.net", "sv=1&sig=x",
                                                                   "AZURE_STORAGE_SAS_TOKEN")
    account = default_account(StreamerConfig(azure_account_key="K"), env=env)
    assert account.credential == {"account_name": "acct", "account_key": "K"}
    # a sovereign cloud by its account URL; the name is the host's first label
    account = default_account(StreamerConfig(azure_account_url="https://acct.blob.core.chinacloudapi.cn"), env={})
    assert account.name == "acct" and account.credential is None and account.found_in == "DefaultAzureCredential"


def test_azure_blob_urls():
    from loader_plugins.core.sources.azure import parse_azure_uri

    cs = f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};" \
         f"BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    cfg = StreamerConfig(azure_connection_string=cs)
    # the configured account by its public URL: its endpoint (here an emulator) and key apply
    account, container, name = parse_azure_uri("https://devstoreaccount1.blob.core.windows.net/c/dir/b.bin", cfg)
    assert (account.endpoint, container, name) == ("http://127.0.0.1:10000/devstoreaccount1", "c", "dir/b.bin")
    # another account: its own URL, and an identity (the configured key is not for it)
    account, container, name = parse_azure_uri("https://other.blob.core.usgovcloudapi.net/c/b", cfg)
    assert (account.name, account.endpoint, account.credential) == ("other", "https://other.blob.core.usgovcloudapi.net",
                                                                    None)
    # nothing configured: the URL's account, with an explicit SAS when one is given
    account, _, _ = parse_azure_uri("https://acct.blob.core.windows.net/c/b", StreamerConfig(azure_sas_token="?sv=1"))
    assert (account.name, account.credential, account.found_in) == ("acct", "sv=1", "azure_sas_token")
    for uri, text in (("https://example.com/c/b", "not an Azure Blob URL"),
                      ("https://acct.blob.core.windows.net/c/b?sv=1&sig=SECRET", "carries a query"),
                      ("https://acct.blob.core.windows.net/", "no container name")):
        with pytest.raises(SourceError, match=text) as info:
            parse_azure_uri(uri, StreamerConfig())
        assert "SECRET" not in str(info.value)


@pytest.mark.parametrize("module", ["gcs_errors", "azure_errors"])
def test_answers_mean_retry_or_a_clear_error(module):
    import importlib

    from loader_plugins.core.sources.remote import Transient

    errors = importlib.import_module(f"loader_plugins.core.sources.{module}")
    uri, what = "gs://b/o", "GET bytes [0, 10)"

    def answer(status, code=""):
        return errors.classify_status(status, code, uri, what, endpoint="http://e", object_key=True)

    for status in (408, 429, 500, 502, 503, 504):
        assert isinstance(answer(status), Transient), status
    changed = answer(412)
    assert isinstance(changed, SourceChangedError) and changed.errno == errno.ESTALE and what in str(changed)
    refused = answer(403, "AuthenticationFailed")
    assert type(refused) is SourceError and refused.errno == errno.EACCES and f"{uri}: {what}" in str(refused)
    missing = answer(404)
    assert isinstance(missing, SourceNotFoundError) and uri in str(missing)
    outside = answer(416)
    assert "outside" in str(outside) and what in str(outside)


def test_azure_messages_leave_out_sas_queries():
    from loader_plugins.core.sources.azure_errors import classify

    exc = OSError("HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: /a/c/b?sv=1&sig=SECRET")
    assert "SECRET" not in str(classify(exc, "az://c/b", "HEAD", endpoint="http://h"))
