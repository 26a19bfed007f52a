"""The GPT-2 BPE encoding (tiktoken), with one clear error when its files cannot be had."""
import functools


class TokenizerUnavailable(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 - tiktoken raises whatever its download raised
        raise TokenizerUnavailable(
            f"could not load tiktoken's GPT-2 encoding ({type(e).__name__}); tiktoken downloads it on first use, "
            "so check the network, or set TIKTOKEN_CACHE_DIR to a folder that holds its files") from None
