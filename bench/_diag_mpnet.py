import traceback, torch, transformers
from transformers import AutoConfig, AutoModelForSequenceClassification
from lorakd import model as M
c = AutoConfig.from_pretrained('/tmp/mpnet', num_labels=4, num_hidden_layers=2)
m = AutoModelForSequenceClassification.from_config(c).float().cuda()
print("attn", m.config._attn_implementation, "ready", M.needs_ready_mask(m))
ids = torch.randint(5, 1000, (4, 32), device="cuda"); mask = torch.ones(4, 32, dtype=torch.long, device="cuda"); mask[0, 20:] = 0
for name, mk in [("4d", M.additive_mask(mask))]:
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(input_ids=ids, attention_mask=mk).logits.sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                m(input_ids=ids, attention_mask=mk).logits.float().sum().backward()
        print(name, "captured")
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        print(name, "FAILED", str(e)[:80], [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}:{f.line}" for f in tb[-7:]])
