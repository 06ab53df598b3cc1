"""Where the names of ``nqpq.data`` went: models and tokenizers to ``nqpq.checkpoints``, text to ``nqpq.text``, the
error class to ``nqpq.errors``. Kept only until every importer names the new module (the sweep's split lands).
"""

from .checkpoints import (  # noqa: F401
    DTYPES,
    GGUF_DEVICE_MAP,
    ByteTokenizer,
    check_architecture,
    demo_model,
    is_gguf,
    load_model,
    load_tokenizer,
    parse_dtype,
    unloaded_weights,
)
from .errors import NqpqError  # noqa: F401
from .hub import OFFLINE_HINT, hub_reachable  # noqa: F401
from .text import (  # noqa: F401
    CUT_MARGIN_TOKENS,
    check_ids_fit,
    choose_bos,
    demo_rows,
    ids_for_blocks,
    join_rows,
    open_text_file,
    rows_from_file,
    rows_from_hub,
    tokenize,
    tokenizer_bos_id,
)
