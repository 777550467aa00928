#!/usr/bin/env python3
# Surge-lead experiment for docs/BENCHMARKS.md (allocation replay, "Lead"): simple causal
# policies on the dev trace, scored with the same surge rule as `forestall replay`, to see how
# much of the surge-lead target any history- or yesterday-based policy can reach.
# Usage: python3 scripts/surge-lead-sim.py [TRACE_DIR]
import csv, json, collections, statistics, sys

d=sys.argv[1] if len(sys.argv) > 1 else '../shared/data/alloc-dev/bitbrains_rnd_2013-8_20vm_7d'
meta=json.load(open(d+'/meta.json'))
th=0.9; res=['cpu','mem','net','disk']; floors={k:v['floor'] for k,v in meta['resources'].items()}
n=meta['n_steps']; warm=meta['warmup_steps']; H=12
use=collections.defaultdict(lambda:[float('nan')]*n)
for r in csv.DictReader(open(d+'/usage.csv')):
    for k in res:
        v=r[k]; use[(r['component'],k)][int(r['step'])]=float(v) if v not in ('','nan') else float('nan')
def fin(v): return v==v
def figures(allocs):
    soft=cells=0; over=collections.Counter(); used=collections.Counter(); ch=0
    pro=st=mi=0
    for key,u in use.items():
        A=allocs[key]; r=key[1]
        for t in range(warm,n):
            if t>0 and abs(A[t]-A[t-1])>0.01*A[t-1]: ch+=1
            if not fin(u[t]): continue
            cells+=1
            if u[t]>th*A[t]: soft+=1
            over[r]+=max(A[t]-u[t],0); used[r]+=u[t]
        last=None
        for t in range(max(warm,H),n):
            x=u[t]; prev=[v for v in u[t-H:t] if fin(v)]
            if not fin(x) or len(prev)<H/2 or x<2*floors[r]: continue
            if not (x>=1.5*statistics.median(prev) and x>max(prev)) or (last is not None and t<last+H): continue
            last=t; need=x/th
            if A[t]>=need:
                if A[t-H]>=need: st+=1
                else: pro+=1
            else: mi+=1
    s=pro+st+mi; days=(n-warm)*300/86400
    slack=sum(over[r]/used[r] for r in res)/4
    return f"soft {100*soft/cells:.2f}% slack {slack:.2f} churn {ch/20/days:.1f} surges {s} pro {100*pro/s:.1f}% stand {100*st/s:.1f}% miss {100*mi/s:.1f}%"
# alloc = m × max(last hour's peak, and with `seas` the same hour yesterday) / θ; raised past a
# `band`, with `over` overshoot; released to the wish (halving at most) after `down_hold` steps
# 30 % below it.
def policy(m, seas, down_hold, band=0.05, over=0.0):
    allocs={}
    for key,u in use.items():
        fl=floors[key[1]]; A=[fl]*n; hold=0
        for t in range(1,n):
            hist=[v for v in u[max(0,t-H):t] if fin(v)]
            base=max(hist) if hist else fl
            want=base
            if seas and t>=288:
                y=[v for v in u[t-288:t-288+H] if fin(v)]
                if y: want=max(want, max(y))
            want=max(fl, m*want/th)
            a=A[t-1]
            if want>a*(1+band): a=want*(1+over); hold=0
            elif want<a*(1-0.3):
                hold+=1
                if hold>=down_hold: a=max(want, a*0.5); hold=0
            else: hold=0
            A[t]=a
        allocs[key]=A
    return allocs
for args in [(1.1,False,24),(1.1,True,24),(1.2,True,24),(1.0,True,12),(1.1,True,6),(1.3,True,24,0.05,0.2)]:
    print(args, figures(policy(*args)))
