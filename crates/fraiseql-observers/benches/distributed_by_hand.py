# The distributed figures of BENCHMARKS.md, by hand (see the "Distributed delivery" section):
# needs the release daemon, the e2e bench binary (its --role receiver) and the backlog database
# fo_bench_e2e_distributed of the `distributed` scenario. Paths below are this machine's.
import subprocess, time, json, urllib.request, os, random, socket, sys, signal
BIN="/root/.cache/target-dist/release/fraiseql-observers"
BENCH="/root/.cache/target-dist/release/deps/e2e-a9ceed6ac4c7df7d"
DB="postgres://postgres@127.0.0.1:5432/fo_bench_e2e_distributed"
P=16; MIF=32; N=int(subprocess.check_output(["psql","-h","127.0.0.1","-U","postgres","-d","fo_bench_e2e_distributed","-Atc","select count(*) from core.tb_entity_change_log"]).strip())
DIR="/tmp/distbench"; os.makedirs(DIR, exist_ok=True)
SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
rec=subprocess.Popen([BENCH,"--role","receiver"],stdout=subprocess.PIPE)
port=int(rec.stdout.readline().decode().split()[1]); base=f"http://127.0.0.1:{port}"
def get(url):
    try: return urllib.request.urlopen(url,timeout=5).read().decode()
    except Exception: return None
def stats(): return json.loads(get(base+"/_stats"))
def reset(): urllib.request.urlopen(urllib.request.Request(base+"/_reset",method="POST"))
def freeport():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
def cpu(pid):
    f=open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split(); return (int(f[11])+int(f[12]))/100
def nats_delete(stream):
    s=socket.create_connection(("127.0.0.1",4222)); s.recv(4096)
    s.sendall(f"CONNECT {{\"verbose\":false}}\r\nPUB $JS.API.STREAM.DELETE.{stream} 0\r\n\r\nPING\r\n".encode()); time.sleep(0.3); s.close()
procs=[]
def start(role,consumer,stream,path,name,dist=True):
    mp=freeport()
    obs=f'[observers.everything]\nentity = "*"\nevent_type = ["INSERT", "UPDATE", "DELETE"]\n\n[[observers.everything.actions]]\ntype = "webhook"\nurl = "{base}{path}"\nsigning_secret_env = "BENCH_SECRET"\nallow_private_networks = true\n'
    d=f'[distributed]\nnats_url = "nats://127.0.0.1:4222"\nstream = "{stream}"\nsubject_prefix = "{stream.lower().replace("_","-")}"\npartitions = {P}\n\n' if dist else ""
    cfg=f'[database]\nurl = "{DB}"\n\n{d}[observers.runtime]\nconsumer_id = "{consumer}"\nstart_position = "beginning"\nmetrics_address = "127.0.0.1:{mp}"\nmax_in_flight = {MIF}\n\n{obs}'
    path_=f"{DIR}/{consumer}-{name}.toml"; open(path_,"w").write(cfg)
    args=[BIN,"run"]+(["--role",role] if role else [])+(["--worker-id",name] if role=="worker" else [])+["--config",path_]
    p=subprocess.Popen(args,env={**os.environ,"BENCH_SECRET":SECRET},stdout=open(f"{DIR}/{consumer}-{name}.log","w"),stderr=subprocess.STDOUT)
    p.mp=mp; procs.append(p); return p
def stop(p):
    p.send_signal(signal.SIGTERM)
    try: p.wait(30)
    except Exception: p.kill(); p.wait()
def owned(p):
    t=get(f"http://127.0.0.1:{p.mp}/healthz")
    return len(json.loads(t).get("partitions",[])) if t else 0
def wait_unique(n, limit=600):
    t0=time.time()
    while True:
        s=stats()
        if s["unique"]>=n: return s
        assert time.time()-t0<limit, s
        time.sleep(0.02)
tag=random.randint(0,1<<30); res={1:[],2:[],4:[]}; out={}
print(f"N={N}", file=sys.stderr)
try:
  for run in (1,2):
    for k in ([1,2,4] if run==1 else [4,2,1]):
        reset(); stream=f"FO_MB_{tag}_{k}_{run}"; consumer=f"mb_{tag}_{k}_{run}"
        ws=[start("worker",consumer,stream,"/slow/d",f"w{i}") for i in range(k)]
        t0=time.time()
        while True:
            c=[owned(w) for w in ws]
            if sum(c)==P and min(c)>=P//k: break
            assert time.time()-t0<120, c; time.sleep(0.05)
        r=start("reader",consumer,stream,"/slow/d","reader")
        s=wait_unique(N); sec=(s["last_ns"]-s["first_ns"])/1e9; eps=N/sec
        print(f"k={k} run={run}: {N} in {sec:.2f}s = {eps:.0f}/s dup={s['duplicates']}", file=sys.stderr)
        res[k].append(eps)
        stop(r); [stop(w) for w in ws]; nats_delete(stream)
  for run in (1,2):
    reset(); stream=f"FO_MB_{tag}_pub_{run}"; consumer=f"mb_{tag}_pub_{run}"
    r=start("reader",consumer,stream,"/drain","reader")
    first=last=None; t0=time.time()
    while True:
        m=get(f"http://127.0.0.1:{r.mp}/metrics") or ""
        v=[float(l.split()[-1]) for l in m.splitlines() if l.startswith("fraiseql_observers_work_published_total")]
        v=v[0] if v else 0
        if v>0 and first is None: first=time.time()
        if v>=N: last=time.time(); break
        assert time.time()-t0<300; time.sleep(0.02)
        if first is None and time.time()-t0>0: pass
    rate=N/(last-first); cr=cpu(r.pid)
    w=start("worker",consumer,stream,"/drain","w0"); s=wait_unique(N); cw=cpu(w.pid)
    stop(r); stop(w); nats_delete(stream)
    reset(); sp=start(None,f"mb_{tag}_single_{run}","","/drain","single",dist=False); s=wait_unique(N); cs=cpu(sp.pid); stop(sp)
    us=lambda x: x*1e6/N
    print(f"run {run}: reader publish {rate:.0f} ev/s; CPU us/event reader {us(cr):.1f} worker {us(cw):.1f} single {us(cs):.1f} hop {us(cr)+us(cw)-us(cs):.1f}", file=sys.stderr)
finally:
  for p in procs:
    if p.poll() is None: p.kill()
  rec.kill()
