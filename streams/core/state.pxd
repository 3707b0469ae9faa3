# C declarations for the compiled build of state.py (Cython's augmenting .pxd; the .py stays the source).
# cpdef: callable from Python as before, and direct C calls within the module. The typed containers are
# exact builtins in every state this module builds or serde decodes (never a subclass).
import cython

# The states: extension types (dataclasses, built by Cython from the .py's @dataclass), their fields C
# struct members. The fields in the .py's order (Cython's __init__ takes them in this order). Event times and
# counters stay objects: a state may hold any int (serde round-trips ints beyond int64).
cdef class UserState:
    cdef public list counts, recent
    cdef public object session
    cdef public dict seen
    cdef public object max_ts, vector, steps, version
    cdef public dict offsets

cdef class ItemState:
    cdef public list counts
    cdef public dict b5, b60
    cdef public object max_ts, eligible, category, vector, steps, version
    cdef public dict offsets
    cdef public object upsert_key

cpdef tuple _user_fields(UserState s)

cpdef tuple _item_fields(ItemState s)

# Every function of a module that knows these types (this one, serde, the worker) types the arguments it annotates
# with them: Cython (3.3) infers the annotated type even with annotation_typing off, and a loop over a field of an
# argument left an object (``for r in state.recent``) then compiles to a read of an unset temporary (a crash).
cpdef dict user_features(UserState state)

cpdef dict item_features(ItemState state, object now_us, object cfg)

# an extension type in the compiled build: built once per user per batch, 25x cheaper than the class
cdef class Outcome:
    cdef public list forwards, forward_src
    # lists, or one shared empty tuple when there are none
    cdef public object duplicates, late, late_src

@cython.locals(out=Outcome)
cpdef Outcome _blank_outcome()

# new states without the dataclass __init__ (see state.py)
@cython.locals(s=UserState)
cpdef UserState _blank_user()

@cython.locals(s=ItemState)
cpdef ItemState _blank_item()

@cython.locals(digests=list)
cpdef object _hash64s(list texts, object seed)

# event times: int64 (see _horizon); ``ts`` stays an object, the one the state stores
cdef long long _I64_MIN

cpdef long long _horizon(long long max_ts, long long lateness)

@cython.locals(i=Py_ssize_t, seen=dict, counts=list, type_info=dict, info=tuple, dropped=list,
               positives=list, new_recent=list, dups=list, late=list, late_src=list, accepted_at=list, accepted=list,
               recent=list, ti=Py_ssize_t, t=cython.longlong, max_ts=cython.longlong, old_max=cython.longlong,
               horizon=cython.longlong, s_ts=cython.longlong, f=tuple, c=tuple)
cpdef tuple _apply_user_features(UserState state, object events, long long lateness, Py_ssize_t recent_n, Outcome out)

@cython.locals(counts=list)
cpdef _bump(dict buckets, object idx, Py_ssize_t impressions, Py_ssize_t clicks, Py_ssize_t positives)

@cython.locals(idx=cython.longlong)
cpdef bint _any_below(dict buckets, long long lo) except -1

# event times in microseconds and their bucket indexes: int64 (event times are datetimes, years 1-9999)
@cython.locals(counts=list, type_index=dict, runs=list, mine=list, b5=dict, b60=dict, e=tuple,
               ts=cython.longlong, max_ts=cython.longlong, old_max=cython.longlong, i5=cython.longlong,
               run5=cython.longlong, i60=cython.longlong, lo5=cython.longlong, lo60=cython.longlong,
               b5_us=cython.longlong, b60_us=cython.longlong, b5_per_b60=cython.longlong,
               n_events=Py_ssize_t, ti=Py_ssize_t, i_impr=Py_ssize_t, i_click=Py_ssize_t, imp=Py_ssize_t,
               clk=Py_ssize_t, pos=Py_ssize_t, n_impr=Py_ssize_t, n_click=Py_ssize_t)
cpdef list _apply_item_entries(ItemState new, object iid, object entries, object cfg, object U, object S)

@cython.locals(out=list, fw=object, ns=object)
cpdef list forward_entries(object forwards, list vecs, list flat, Py_ssize_t row_base=*, Py_ssize_t score_base=*)

@cython.locals(news=list, steps=list, ids=list, new=ItemState)
cpdef list _apply_item_entries_batch(object batch, object cfg, object U, object S, bint in_place)

@cython.locals(src=list, seqs=list, i=Py_ssize_t)
cpdef list forward_seqs(Outcome out, object positions)

@cython.locals(news=list, outs=list, accepted=list, accepted_at=list, positives=list, n_pos=list, order=list,
               pos_fw=list, uids=list, fresh=list, row_uid=list, row_fw=list, results=list, fwds=list, src=list,
               out=Outcome, j=Py_ssize_t, row=Py_ssize_t, e=Py_ssize_t, weights=dict, lr_of=dict, before=list,
               evs=list, ns=tuple, n_neg=Py_ssize_t, at0=Py_ssize_t, n_long=Py_ssize_t, ev_rows=list, snaps=list,
               iids=list, crcs=list, lrs=list, st=tuple, eid=str, at=list, acc=list, k=Py_ssize_t, f=tuple,
               per_key=list, vecs=list, new=UserState)
cpdef list _apply_user_batch(object batch, object cfg, object items, object in_place)

@cython.locals(lens=list, n_long=Py_ssize_t, m=Py_ssize_t, r=Py_ssize_t, q=Py_ssize_t, bounds=list, lo=list, hi=list,
               flat=list, rounds=list)
cpdef list _rounds(list per_key, Py_ssize_t max_rounds)

@cython.locals(row=Py_ssize_t, j=Py_ssize_t, after=list)
cpdef _store_vectors(list news, list order, object M, list n_steps)

@cython.locals(row=Py_ssize_t, j=Py_ssize_t, after=list, new=UserState)
cpdef _store_user_vectors(list news, list order, object M, list n_steps)

@cython.locals(n_steps=list, order=list, fresh=list, j=Py_ssize_t, row=Py_ssize_t, lr_of=dict, es=list, e=tuple,
               at=list, lrs=list, k=Py_ssize_t, same_k=bint, by_row=bint, n=Py_ssize_t, i=Py_ssize_t,
               r=Py_ssize_t, s0=Py_ssize_t)
cpdef _item_steps(list news, list steps, object cfg, object ids=*, object U=*, object S=*)

cpdef object _float32s(list values)

cpdef object _uint64s(list values)

cpdef object _intps(list values)
