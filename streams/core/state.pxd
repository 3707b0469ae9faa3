# C declarations for the compiled build of state.py (Cython's augmenting .pxd; the .py stays the source).
# cpdef: callable from Python as before, and direct C calls within the module. The typed containers are
# exact builtins in every state this module builds or serde decodes (never a subclass).
import cython

@cython.locals(i=Py_ssize_t, seen=dict, counts=list, type_index=dict, type_value=dict, weights=dict, dropped=list,
               positives=list, new_recent=list, dups=list, late=list, accepted_at=list, accepted=list, merged=list)
cpdef tuple _apply_user_features(object state, object events, object cfg, object out)

@cython.locals(counts=list)
cpdef _bump(dict buckets, object idx, tuple slot)

@cython.locals(counts=list, type_index=dict, events=list, mine=list, b5=dict, b60=dict, slots=dict)
cpdef list _apply_item_forwards(object new, object iid, object forwards, object cfg)

@cython.locals(src=list, seqs=list)
cpdef list forward_seqs(object out, object positions)
