# C declarations for the compiled build of serde.py (Cython's augmenting .pxd; the .py stays the source).
# The typed containers are exact builtins: what this module builds, or what orjson.loads returns.
import cython
# the state classes' fields as C struct members (the compiled state module's extension types)
from streams.core.state cimport ItemState, UserState

# positions, seqs and times as C integers: Kafka offsets and timestamps, and event times in us (years
# 1-9999), are int64; the int block is a typed memoryview, written by C array stores
@cython.locals(ints="long long[::1]", ni=Py_ssize_t, strs=list, extras=list, vectors=list, scores_flat=list,
               numbers=dict, items=dict, k=Py_ssize_t, dim=Py_ssize_t, flags=Py_ssize_t, slots=Py_ssize_t,
               mask=cython.longlong, shift=int, n=Py_ssize_t, seq=cython.longlong, prev=cython.longlong, pos=cython.longlong, last_pos=cython.longlong,
               ts_us=cython.longlong, ts_ms=cython.longlong, g_ts_us=cython.longlong, g_ts_ms=cython.longlong,
               native=bint, extended=bint, new_group=bint, is_upsert=bint)
cpdef bytes encode_forward_pack(object src, object forwards)

@cython.locals(vecs=list, flat=tuple, ints="const long long[::1]", strs=list, extras=list, seqs=list, forwards=list,
               stamps=list, items=list, types=dict, wire=tuple, v3=bint, row=Py_ssize_t, si=Py_ssize_t, ii=Py_ssize_t,
               xi=Py_ssize_t, si_f=Py_ssize_t, k=Py_ssize_t, n_ints=Py_ssize_t, code=cython.longlong,
               flags=cython.longlong, shift=int, mask=cython.longlong, base=cython.longlong, fw=tuple, j=Py_ssize_t)
cpdef tuple decode_forward_pack(object data)

@cython.locals(fields=tuple, dim=Py_ssize_t, rows=Py_ssize_t, n_scores=Py_ssize_t, at=Py_ssize_t)
cpdef tuple _pack_blocks(object data, object head, object fmt)

@cython.locals(vecs=list, flat=tuple)
cpdef tuple _blocks(object data, Py_ssize_t dim, Py_ssize_t rows, Py_ssize_t n_scores, Py_ssize_t vec_at,
                    Py_ssize_t score_at)

@cython.locals(v3=bint, dim=Py_ssize_t, rows=Py_ssize_t, n_scores=Py_ssize_t, n_ints=Py_ssize_t, at=Py_ssize_t,
               end=Py_ssize_t, body_at=Py_ssize_t)
cpdef tuple _pack_parts(object data)

@cython.locals(vecs=list, flat=tuple, groups=list, entries=list, e=list, seqs=list, forwards=list, stamps=list,
               types=dict, row=Py_ssize_t, si=Py_ssize_t, k=Py_ssize_t, n=Py_ssize_t, rows=Py_ssize_t,
               n_scores=Py_ssize_t, fw=tuple)
cpdef tuple _decode_pack1(object data)

@cython.locals(spare=dict, buf=bytearray)
cpdef bytes _pack(object vector, object body)

@cython.locals(dim=Py_ssize_t, heads=dict)
cpdef bytes _value(object vector, bytearray body)

cdef bint _COMPILED
cdef Py_ssize_t _HEAD_SIZE

cpdef bytes _state_value(object vector, object body, bytearray buf)

# the value's bytes through the bytearray's C buffer (``p``) and the vector's bytes (``d``)
@cython.locals(dim=Py_ssize_t, n=Py_ssize_t, at=Py_ssize_t, end=Py_ssize_t, k=Py_ssize_t, data=bytes, p="unsigned char *",
               d="const unsigned char *")
cpdef bytes _value_into(object vector, object body, bytearray buf)

# the states typed wherever this module annotates them (see state.pxd)
cpdef bytes encode_user(UserState s)

cpdef bytes encode_item(ItemState s)

cpdef bytes user_digest(UserState s)

cpdef bytes item_digest(ItemState s)

@cython.locals(out=list, spare=dict, s=UserState, body=list, buf=bytearray)
cpdef list encode_users(list states)

@cython.locals(out=list, spare=dict, body=list, s=ItemState, buf=bytearray)
cpdef list encode_items(list states)

@cython.locals(out=list, v=list)
cpdef list _buckets_out(object buckets)

# the integers as C integers where they lie (PACK4) or in an array (the body's list: PACK3, PACK2)
@cython.locals(ints="const long long[::1]", sv="long long[::1]", ne=Py_ssize_t, strs=list, extras=list, item_of=list,
               numbers=dict,
               entries=list, stamps=list, head=tuple, vec_at=Py_ssize_t,
               items=list, types=dict, wire=tuple, v3=bint, row=Py_ssize_t, si=Py_ssize_t, ii=Py_ssize_t, xi=Py_ssize_t,
               si_f=Py_ssize_t, k=Py_ssize_t, j=Py_ssize_t, n_ints=Py_ssize_t, n_strs=Py_ssize_t,
               dim=Py_ssize_t, at=Py_ssize_t, end=Py_ssize_t, r=Py_ssize_t,
               code=cython.longlong, flags=cython.longlong, shift=int, mask=cython.longlong, base=cython.longlong,
               d=cython.longlong, pos=cython.longlong, ts_us=cython.longlong, ts_ms=cython.longlong, entry=tuple)
cpdef tuple decode_forward_entries(object data, Py_ssize_t row_base=*, Py_ssize_t score_base=*)

cpdef _check_used(bint v3, tuple head, Py_ssize_t n, Py_ssize_t rows, Py_ssize_t scores, Py_ssize_t strs,
                  Py_ssize_t n_strs, Py_ssize_t extras, Py_ssize_t n_extras)

@cython.locals(dim=Py_ssize_t, end=Py_ssize_t)
cpdef tuple _split(object data)
