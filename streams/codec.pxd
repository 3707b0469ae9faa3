# C types for the locals of streams/codec.py (an augmenting declaration file: the .py stays the
# source; Cython reads this when it compiles the module, see setup.py and streams/_compiled.py)
import cython

@cython.locals(raw=bytes, ts=cython.longlong)
cpdef object _utc_time_scan(str text)

@cython.locals(n=Py_ssize_t, frac=cython.longlong, year=cython.longlong, month=cython.longlong,
               day=cython.longlong, hour=cython.longlong, minute=cython.longlong, second=cython.longlong,
               month_days=cython.longlong, y=cython.longlong, day_of_year=cython.longlong, days=cython.longlong)
cdef long long _utc_time_at(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept

@cython.locals(n=Py_ssize_t, frac=cython.longlong, head=str, digits=str)
cpdef object _utc_time_memo(str text)

cpdef object _utc_time_us(str text)

cdef Py_ssize_t _ID_LEN
cdef long long _FUTURE_US
cdef Py_ssize_t _MAX_BYTES
cdef Py_ssize_t _MAX_SLATE
cdef long long _REF_MIN
cdef long long _REF_MAX
cdef long long _NO_TIME
cdef bint _COMPILED

cpdef object decode(object data, object ref_us=*)

cpdef object decode_at(object data, long long record_ms)

cdef object _decode(object data, bint check, long long ref_us)

@cython.locals(w=object, event_id=str, user_id=str, item_id=str, ts=cython.longlong)
cpdef object _decode_general(object data, bint check, long long ref_us)

cdef object _strict(object data, bint check, long long ref_us)

# the canonical form's scanner: field numbers and limits as C constants, the bytes read through a pointer
cdef int _F_EVENT_ID, _F_TYPE, _F_USER_ID, _F_EVENT_TIME, _F_VERSION, _F_CONTEXT, _F_ITEM_ID, _F_ITEMS
cdef int _F_REQUEST_ID, _F_PROPENSITY, _F_ELIGIBLE, _F_CATEGORY, _F_VECTOR
cdef int _C_SURFACE, _C_SESSION_ID, _C_DEVICE, _C_POSITION
cdef int _REQUIRED
cdef long long _MAX_VERSION
cdef Py_ssize_t _MAX_DIGITS
cdef Py_ssize_t _FEW_SLOTS
cdef list _FEW
cdef object _VIEW, _CLICK, _ADD_TO_CART, _PURCHASE, _IMPRESSION, _UPSERT, _NO_CONTEXT

@cython.locals(p=cython.p_const_uchar, n=Py_ssize_t, i=Py_ssize_t, e=Py_ssize_t, a=Py_ssize_t, b=Py_ssize_t,
               f=cython.int, seen=cython.int, ts=cython.longlong, version=cython.longlong, eligible=bint,
               items=tuple, event_id=str, user_id=str, item_id=str, request_id=str, category=str, got=tuple,
               slate=tuple)
cpdef object _scan(bytes data, bint check, long long ref_us)

@cython.locals(e=Py_ssize_t, f=cython.int, seen=cython.int)
cdef object _context_at(const unsigned char* p, Py_ssize_t i, Py_ssize_t n)

@cython.locals(k=Py_ssize_t, seen=tuple, raw=bytes, s=str)
cdef str _few_str(const unsigned char* p, Py_ssize_t a, Py_ssize_t b)

@cython.locals(e=Py_ssize_t, out=list)
cdef object _slate_at(const unsigned char* p, Py_ssize_t i, Py_ssize_t n)

@cython.locals(bad=cython.uchar, k=Py_ssize_t, c=cython.uchar)
cdef bint _printable(const unsigned char* p, Py_ssize_t n) noexcept

cdef Py_ssize_t _str_end(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept

@cython.locals(j=Py_ssize_t)
cdef Py_ssize_t _uint_end(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept

@cython.locals(v=cython.longlong, k=Py_ssize_t, c=cython.int)
cdef long long _digits(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept

@cython.locals(k=Py_ssize_t)
cdef bint _same(const unsigned char* p, Py_ssize_t a, Py_ssize_t b, const char* name) noexcept

cdef int _field(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept

cdef int _context_field(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept

cdef object _event_type(const unsigned char* p, Py_ssize_t a, Py_ssize_t b)
