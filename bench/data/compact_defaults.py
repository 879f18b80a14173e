#!/usr/bin/env python3
# Usage: bench/data/compact_defaults.py FILE.json — rewrites FILE in place, one row per line,
# and checks that every row merged onto the defaults equals the row it was (null as absent).
# Moves what most rows of a published-runs file share into its "defaults" (JSON merge patch).
import json, sys, collections
path = sys.argv[1]
doc = json.load(open(path))
rows = doc["runs"] if isinstance(doc, dict) else doc
assert isinstance(rows, list)

def leaves(d, p=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, p + (k,))
        else:
            yield p + (k,), v

count = collections.defaultdict(collections.Counter)
for r in rows:
    for p, v in leaves(r):
        count[p][json.dumps(v, sort_keys=True)] += 1
defaults = {}
for p, c in count.items():
    if p == ("id",):
        continue
    v, n = c.most_common(1)[0]
    if n * 2 > len(rows) and json.loads(v) is not None:
        d = defaults
        for k in p[:-1]:
            d = d.setdefault(k, {})
        d[p[-1]] = json.loads(v)

def get(d, p):
    for k in p:
        if not isinstance(d, dict) or k not in d:
            return KeyError
        d = d[k]
    return d

def strip(r):
    out = json.loads(json.dumps(r))
    for p, dv in leaves(defaults):
        v = get(r, p)
        if v is KeyError or v is None:
            # absent (or null) where the defaults have a value: null removes it on merge
            d = out
            for k in p[:-1]:
                d = d.setdefault(k, {})
            d[p[-1]] = None
        elif json.dumps(v, sort_keys=True) == json.dumps(dv, sort_keys=True):
            d = out
            for k in p[:-1]:
                d = d[k]
            del d[p[-1]]
    def prune(d):
        for k in list(d):
            if isinstance(d[k], dict):
                prune(d[k])
                if not d[k]:
                    del d[k]
    prune(out)
    return out

def merge(t, patch):
    if not isinstance(patch, dict):
        return patch
    t = dict(t) if isinstance(t, dict) else {}
    for k, v in patch.items():
        if v is None:
            t.pop(k, None)
        else:
            t[k] = merge(t.get(k), v)
    return t

def norm(d):
    if isinstance(d, dict):
        return {k: norm(v) for k, v in d.items() if v is not None and not (isinstance(v, dict) and not norm(v))}
    return d

stripped = [strip(r) for r in rows]
for r, s in zip(rows, stripped):
    assert norm(merge(defaults, s)) == norm(r), r["id"]
with open(path, "w") as f:
    f.write('{\n"defaults": ' + json.dumps(defaults, indent=1, ensure_ascii=False) + ',\n"runs": [\n')
    f.write(",\n".join(json.dumps(s, ensure_ascii=False) for s in stripped))
    f.write("\n]\n}\n")
