"""Fine-tuning datasets: validate, preview, transform and export, streaming.

Plain Python (no Django, no database): the control plane's tasks call these functions
with a file path and options and store what they return. Every function reads the file
as a stream with bounded memory, whatever its size.
"""

from .core import DatasetError, FileFormat, RowError, Shape, ValidationOptions
from .preview import PreviewRow, read_page
from .readers import sniff_format
from .rows import row_text
from .transform import Derived, canonical, csv_safe_cell, export_csv, transform
from .validation import Report, validate

__all__ = [
    "DatasetError",
    "Derived",
    "FileFormat",
    "PreviewRow",
    "Report",
    "RowError",
    "Shape",
    "ValidationOptions",
    "canonical",
    "csv_safe_cell",
    "export_csv",
    "read_page",
    "row_text",
    "sniff_format",
    "transform",
    "validate",
]
