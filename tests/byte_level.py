"""The 256 symbols of byte-level BPE, for tiny tokenizers (CLIP, RoBERTa, GPT-2) with no merges."""


def byte_symbols() -> list[str]:
    """GPT-2's ``bytes_to_unicode``: printable bytes stand for themselves, the rest map above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]
