# C types for the per-record loops of streams/worker.py (an augmenting declaration file: the .py
# stays the source; Cython reads this when it compiles the module, see setup.py and
# streams/_compiled.py). Only containers this module builds are typed (exact dict/list/tuple);
# what the core or the client returns stays a Python object. cpdef: callable from Python, and
# direct C calls from within the module.
import cython
# the states' and the core's Outcome's fields as C struct members (the compiled state module's extension types)
from streams.core.state cimport ItemState, Outcome, UserState, forward_seqs
# the codec's decoder, called per record: a C call
from streams.codec cimport decode_at

@cython.locals(i=Py_ssize_t)
cpdef object _lowest(list xs)

cpdef object _highest(list xs)

cpdef _send(object producer, object topic, object value, object key, object partition, object ts_ms=*,
            object on_delivery=*)

cpdef _cache_put(dict cache, Py_ssize_t limit, str key, object state)

cpdef _put_state(object key, object raw_key, str key_id, object state, object value, dict puts, dict cache,
                 Py_ssize_t limit, object producer, object produce, object changelog, object partition)

@cython.locals(raw=list, keys=list, i=str, r=bytes, prefix=bytes)
cpdef tuple _state_keys(list ids)

@cython.locals(n=Py_ssize_t, at=Py_ssize_t, cache=dict, limit=Py_ssize_t)
cpdef _put_states(list work, list news, list values, list ids, list raw_keys, list keys, dict puts, object shard,
                  object producer, object changelog)

@cython.locals(out=list, missing=list, from_store=list)
cpdef tuple _fetch_states(dict cache, object store, list ids, list keys, dict pending, object decode)

@cython.locals(groups=dict, mine=list, found=list)
cpdef dict _by_partition(object msgs)

@cython.locals(per_user=dict, mine=tuple, fresh=tuple)
cpdef dict _group_user_events(list batch, list forwards, dict rec_ts, list rejected, list stamps)

@cython.locals(i=Py_ssize_t, k=Py_ssize_t, dropped=Py_ssize_t, work=list, offsets=list, offs=list, xs=list, fresh=list,
               applied=dict, user=UserState, item=ItemState)
cpdef tuple _past_guards(list keys, list states, dict inputs, object topic)

@cython.locals(per_item=dict, mine=tuple, read=Py_ssize_t, resent=Py_ssize_t, start=Py_ssize_t, n=Py_ssize_t,
               i=Py_ssize_t, dim=Py_ssize_t, rows=Py_ssize_t, n_scores=Py_ssize_t, pack_dim=Py_ssize_t,
               vec_blocks=list, score_blocks=list, items=list, item_of=list, entries=list, stamps=list,
               inputs=list, j=Py_ssize_t)
cpdef tuple _group_forward_packs(list batch, dict hwm, set touched_src, list fresh_ts)

@cython.locals(n=Py_ssize_t, j=Py_ssize_t, duplicates=Py_ssize_t, offs=list, news=list, applied=dict, new=UserState,
               out=Outcome, seqs=list, fws=list, fw_src=list, src=Py_ssize_t, last_src=Py_ssize_t)
cpdef Py_ssize_t _store_users(list work, list offsets, object results, object topic, dict rec_ts, list forwards,
                              list late, dict puts, object shard, object producer, object changelog, list ids,
                              list raw_keys, list keys) except -1

@cython.locals(per_part=list, found=list, mine=list, t=tuple, fws=list, i=Py_ssize_t, n=Py_ssize_t)
cpdef _send_forward_packs(object producer, object topic, object src, list forwards, dict part_memo,
                          object partitions, object on_delivery=*)

@cython.locals(n=Py_ssize_t, applied=dict, new=ItemState, with_vector=list, vectors=list)
cpdef _store_items(list work, list offsets, object results, object topic, dict puts, object shard,
                   object producer, object changelog, object replica, list ids, list raw_keys, list keys)
