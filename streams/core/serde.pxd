# C declarations for the compiled build of serde.py (Cython's augmenting .pxd; the .py stays the source).
# The typed containers are exact builtins: what this module builds, or what orjson.loads returns.
import cython

@cython.locals(groups=list, vectors=list, scores_flat=list, entries=list, values=dict, k=Py_ssize_t, dim=Py_ssize_t)
cpdef bytes encode_forward_pack(object src, object forwards)

@cython.locals(vecs=list, flat=tuple, groups=list, entries=list, e=list, seqs=list, forwards=list, stamps=list,
               types=dict, row=Py_ssize_t, si=Py_ssize_t, k=Py_ssize_t, n=Py_ssize_t, rows=Py_ssize_t,
               n_scores=Py_ssize_t, fw=tuple)
cpdef tuple decode_forward_pack(object data)

cpdef bytes _pack(object vector, object body)

cpdef list _buckets_out(object buckets)
