# C types for the locals of streams/codec.py (an augmenting declaration file: the .py stays the
# source; Cython reads this when it compiles the module, see setup.py and streams/_compiled.py)
import cython

@cython.locals(n=Py_ssize_t, frac=cython.longlong, head=str, digits=str)
cpdef object _utc_time_us(str text)

@cython.locals(w=object)
cpdef object decode(object data, object ref_us=*)
