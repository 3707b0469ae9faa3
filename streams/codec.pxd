# C types for the locals of streams/codec.py (an augmenting declaration file: the .py stays the
# source; Cython reads this when it compiles the module, see setup.py and streams/_compiled.py)
import cython

@cython.locals(n=Py_ssize_t, k=Py_ssize_t, ch=Py_UCS4, c=cython.long, form=bytes, date=cython.long,
               clock=cython.long, frac=cython.long, year=cython.long, month=cython.long, day=cython.long,
               hour=cython.long, minute=cython.long, second=cython.long, month_days=cython.long,
               y=cython.longlong, day_of_year=cython.longlong, days=cython.longlong)
cpdef object _utc_time_scan(str text)

@cython.locals(n=Py_ssize_t, frac=cython.longlong, head=str, digits=str)
cpdef object _utc_time_memo(str text)

cpdef object _utc_time_us(str text)

cdef Py_ssize_t _ID_LEN
cdef long long _FUTURE_US
cdef Py_ssize_t _MAX_BYTES
cdef Py_ssize_t _MAX_SLATE
cdef long long _REF_MIN
cdef long long _REF_MAX

cpdef object decode(object data, object ref_us=*)

cpdef object decode_at(object data, long long record_ms)

@cython.locals(w=object, event_id=str, user_id=str, item_id=str, ts=cython.longlong)
cdef object _decode(object data, bint check, long long ref_us)

cdef object _strict(object data, bint check, long long ref_us)
