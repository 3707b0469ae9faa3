# C declarations for the compiled build of vectors.py (Cython's augmenting .pxd; the .py stays the source).
import cython

@cython.locals(found=list)
cpdef object _row_indexes(dict rows, object keys)
