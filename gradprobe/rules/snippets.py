"""Code snippets several rule families recommend (text only: no rules here, so any rule
module may import it)."""

AMP_SNIPPET_BF16 = """\
# bfloat16 has float32's exponent range (max ~3.4e38): nothing overflows at 65504,
# and no GradScaler is needed.
with torch.autocast(device_type=device, dtype=torch.bfloat16):
    loss = loss_fn(model(x), y)
loss.backward()
optimizer.step()
optimizer.zero_grad(set_to_none=True)"""

SCALER_LOOP = """\
scaler = torch.amp.GradScaler(device){args}
for x, y in loader:
    with torch.autocast(device_type=device, dtype=torch.float16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)            # once per step, before clipping or inspecting grads
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)                # skips the step by itself on inf/NaN gradients
    scaler.update()                       # every iteration: this is what backs the scale off
    optimizer.zero_grad(set_to_none=True)"""
