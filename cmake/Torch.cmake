# Locates the PyTorch installed for a Python interpreter, as a torch C++ extension would, but
# without TorchConfig.cmake (which re-detects CUDA, cuDNN and NCCL): the plugin needs only
# torch's headers and libc10 / libc10_cuda.
#
# Input:  STITCHALLOC_PYTHON (cache; default: the Python that runs the build, e.g. under pip).
# Output: STITCHALLOC_TORCH_FOUND, STITCHALLOC_TORCH_DIR (the torch package folder),
#         STITCHALLOC_TORCH_VERSION, STITCHALLOC_TORCH_CXX11_ABI.
#
# Under `pip install .` the build runs in an isolated environment that hides the target
# environment's site-packages through PYTHONPATH / PYTHONNOUSERSITE; the query drops both so
# it sees the torch the package will run against (the build never installs a second torch).
set(STITCHALLOC_TORCH_FOUND FALSE)
set(_py "${STITCHALLOC_PYTHON}")
if(NOT _py)
  if(DEFINED Python_EXECUTABLE)
    set(_py "${Python_EXECUTABLE}")
  elseif(DEFINED ENV{VIRTUAL_ENV} AND EXISTS "$ENV{VIRTUAL_ENV}/bin/python")
    set(_py "$ENV{VIRTUAL_ENV}/bin/python")
  endif()
endif()
if(_py)
  execute_process(
    COMMAND ${CMAKE_COMMAND} -E env --unset=PYTHONPATH --unset=PYTHONNOUSERSITE --unset=PYTHONHOME
            "${_py}" -c "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
    OUTPUT_VARIABLE _out ERROR_VARIABLE _err RESULT_VARIABLE _rc OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_rc EQUAL 0)
    string(REPLACE "\n" ";" _lines "${_out}")
    list(GET _lines 0 STITCHALLOC_TORCH_DIR)
    list(GET _lines 1 STITCHALLOC_TORCH_VERSION)
    list(GET _lines 2 STITCHALLOC_TORCH_CXX11_ABI)
    if(EXISTS "${STITCHALLOC_TORCH_DIR}/include/c10/cuda/CUDACachingAllocator.h"
       AND EXISTS "${STITCHALLOC_TORCH_DIR}/lib/libc10_cuda.so")
      set(STITCHALLOC_TORCH_FOUND TRUE)
      message(STATUS "stitchalloc: PyTorch ${STITCHALLOC_TORCH_VERSION} at ${STITCHALLOC_TORCH_DIR}")
    else()
      message(STATUS "stitchalloc: PyTorch ${STITCHALLOC_TORCH_VERSION} at ${STITCHALLOC_TORCH_DIR} has no CUDA "
                     "support (no c10/cuda); the torch plugin is not built")
    endif()
  else()
    message(STATUS "stitchalloc: no PyTorch for ${_py}; the torch plugin is not built")
  endif()
endif()
