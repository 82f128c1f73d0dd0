"""Data: ingest (URL lists, the img2dataset download on Ray, raw shards), the tokenize stage, SFT task formats."""

from cm3.core.exports import lazy_exports

_EXPORTS = {  # public name -> the module that defines it
    "open_url_list": "url_list", "DownloadSettings": "download", "run_download": "download",
    "TokenizeSettings": "tokenize", "run_tokenize": "tokenize", "make_row": "sft_tasks",
    "write_task_shards": "sft_tasks", "sft_schema": "sft_tasks", "convert": "sft_convert",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
