// A mask painter over the source image: white strokes = repaint (A1111's convention).

export class MaskPainter {
  constructor(canvas, { sizeInput, eraserInput }) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.sizeInput = sizeInput;
    this.eraserInput = eraserInput;
    this.painted = false;
    this.last = null;
    canvas.addEventListener("pointerdown", (e) => this.start(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointerleave", "pointercancel"]) canvas.addEventListener(type, () => { this.last = null; });
  }

  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
  }

  point(e) {
    const rect = this.canvas.getBoundingClientRect();
    const scale = this.canvas.width / rect.width;
    return { x: (e.clientX - rect.left) * scale, y: (e.clientY - rect.top) * scale, scale };
  }

  start(e) {
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (!this.last) return;
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  stroke(from, to) {
    const ctx = this.ctx;
    ctx.globalCompositeOperation = this.eraserInput.checked ? "destination-out" : "source-over";
    ctx.strokeStyle = "#fff";
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Number(this.sizeInput.value) * to.scale;
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    if (!this.eraserInput.checked) this.painted = true;
  }

  hasMask() {
    if (!this.painted) return false;
    const data = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return true;
    return false;
  }

  // Black background, white where painted: the mask the server expects.
  toDataURL() {
    const out = document.createElement("canvas");
    out.width = this.canvas.width;
    out.height = this.canvas.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.drawImage(this.canvas, 0, 0);
    return out.toDataURL("image/png");
  }
}
