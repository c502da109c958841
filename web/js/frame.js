// Render scheduling: at most one render per animation frame, and under a
// flood of changes at most one per `minGap` ms, so 500 changes a second cost
// a handful of DOM updates a second instead of one per change. A render after
// a quiet spell happens on the next frame.

export class FrameThrottle {
  constructor(render, minGap) {
    this.render = render;
    this.minGap = minGap;
    this.last = 0;
    this.frame = 0;
    this.timer = 0;
  }

  schedule() {
    if (this.frame || this.timer) return;
    const wait = this.last + this.minGap - performance.now();
    if (wait > 0) this.timer = setTimeout(() => {
      this.timer = 0;
      this.request();
    }, wait);
    else this.request();
  }

  request() {
    this.frame = requestAnimationFrame(() => this.now());
  }

  /** Renders at once (and cancels a scheduled render). */
  now() {
    cancelAnimationFrame(this.frame);
    clearTimeout(this.timer);
    this.frame = 0;
    this.timer = 0;
    this.last = performance.now();
    this.render();
  }
}
