"""Base weights by name: the official CLaMP 3 releases on the Hugging Face hub, any hub file, or a path.

    --weights c2                      the official C2 release (symbolic music retrieval; the default)
    --weights saas                    the official SAAS release (audio-based retrieval)
    --weights REPO_ID:FILENAME        any file on the hub, e.g. sander-wood/clamp3:weights_....pth
    --weights path/to/file.pth        a local checkpoint

Names are fetched with huggingface_hub into its shared cache (HF_HOME; a progress bar; an
interrupted download resumes; a file whose size differs from what the hub announced is not kept),
once: later runs use the cache. Offline (HF_HUB_OFFLINE=1 or no network) with the file not cached,
the error says which file it is and how to fetch it elsewhere.
"""
import os
from pathlib import Path

from .errors import CheckpointError

REPO = "sander-wood/clamp3"
_SIZES = "h_size_768_t_model_FacebookAI_xlm-roberta-base_t_length_128_a_size_768_a_layers_12_a_length_128_" \
         "s_size_768_s_layers_12_p_size_64_p_length_512"
OFFICIAL = {
    "c2": (REPO, f"weights_clamp3_c2_{_SIZES}.pth"),
    "saas": (REPO, f"weights_clamp3_saas_{_SIZES}.pth"),
}
"""The official releases named in CLaMP 3's README: C2 for symbolic music (sheet music, MIDI), the
encoder this trainer adapts; SAAS for audio-based retrieval."""


def hub_file(name):
    """(repo id, filename) when `name` names a hub file (c2, saas, REPO_ID:FILENAME), else None."""
    if name in OFFICIAL:
        return OFFICIAL[name]
    repo, colon, filename = name.partition(":")
    if colon and repo.count("/") == 1 and filename and not Path(name).exists() and not Path(repo).is_absolute():
        return repo, filename
    return None


def resolve(name):
    """The local path of the weights `name` names, downloading a hub file into the cache if needed.
    A local path is returned as it is (the loader says when it is missing)."""
    found = hub_file(name)
    if found is None:
        if not Path(name).exists() and "/" not in name and "." not in name:
            raise CheckpointError(f"--weights {name!r}: not a file, and not a name of weights: use c2 or saas (the "
                                  f"official releases), REPO_ID:FILENAME (a hub file) or the path of a .pth")
        return name
    repo, filename = found
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    try:
        return hf_hub_download(repo, filename)
    except LocalEntryNotFoundError as error:  # offline, or the hub unreachable, and not in the cache
        raise CheckpointError(offline_message(name, repo, filename)) from error
    except (EntryNotFoundError, RepositoryNotFoundError) as error:
        raise CheckpointError(f"--weights {name}: the hub has no file {filename} in {repo} "
                              f"({type(error).__name__})") from error
    except HfHubHTTPError as error:
        raise CheckpointError(f"--weights {name}: the hub refused {filename} from {repo}: {error}") from error
    except Exception as error:  # the network libraries under huggingface_hub raise many types (a connection
        # cut off mid-file, a size that does not match); each means this download failed: say so, by name
        raise CheckpointError(f"--weights {name}: downloading {filename} from {repo} failed "
                              f"({type(error).__name__}: {error}); run again to resume it") from error


def offline_message(name, repo, filename):
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    return (f"--weights {name}: {filename} (hub repository {repo}) is not in the Hugging Face cache ({cache}) and the "
            f"hub cannot be reached (HF_HUB_OFFLINE=1 or no network). Fetch it once on a machine with network: "
            f"`hf download {repo} {filename}` (or `huggingface-cli download ...`), then copy the cache folder here "
            f"or pass --weights PATH to the downloaded file.")


def hub_unreachable(timeout_s=3):
    """Why the Hugging Face hub cannot be reached ("" when it can): offline mode, or no TCP connection
    to its host within `timeout_s`. Asked before a download so that an offline machine is told at
    once instead of after the download library's retries."""
    import socket
    import urllib.parse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    url = urllib.parse.urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    try:
        socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout_s).close()
    except OSError as error:
        return f"the hub at {host} cannot be reached: {error.strerror or error}"
    return ""


def download_plan(name):
    """(bytes to download or None when the hub does not say, free bytes on the cache's disk) of a hub
    name that is not cached yet, asked before downloading (the preflight reports it)."""
    import shutil

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    repo, filename = hub_file(name)
    try:
        size = get_hf_file_metadata(hf_hub_url(repo, filename)).size
    except Exception:  # the download that follows reports what is wrong, by name
        size = None
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    return size, shutil.disk_usage(cache).free


def cached(name):
    """The cached path of a hub name (None if not cached yet), or None for a local path."""
    found = hub_file(name)
    if found is None:
        return None
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(*found)
    return path if isinstance(path, str) else None
