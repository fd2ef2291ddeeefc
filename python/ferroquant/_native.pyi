"""Type stub of the Rust extension module ferroquant._native."""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class QuantizeError(ValueError): ...
class FormatError(ValueError): ...

def quantize(
    x: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    src_dtype: str,
    qtype: str,
    imatrix: npt.NDArray[np.float32] | None = None,
    block_size: int | None = None,
    double_quant: bool = False,
    scale_mode: str | None = None,
) -> dict[str, Any]: ...
def dequantize(
    data: npt.NDArray[np.uint8],
    qtype: str,
    rows: int,
    cols: int,
    block_size: int,
    stats: npt.NDArray[np.float32] | None = None,
    scale_mode: str | None = None,
    double_quant: dict[str, Any] | None = None,
) -> npt.NDArray[np.float32]: ...
def qtypes() -> list[tuple[str, int, int, float, int | None, str]]: ...
def block_struct_sizes() -> list[tuple[str, int]]: ...
def set_num_threads(n: int) -> None: ...
def num_threads() -> int: ...
def simd_level() -> str: ...
def qmatmul(
    x: npt.NDArray[np.float32],
    data: npt.NDArray[np.uint8],
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    stats: npt.NDArray[np.float32] | None = None,
    scale_mode: str | None = None,
) -> npt.NDArray[np.float32]: ...
def qmatmul_qtypes() -> list[str]: ...
