// Applies the saved light/dark choice before the first paint (a classic,
// blocking script so the page never flashes the wrong theme). Without a
// saved choice the page follows prefers-color-scheme through CSS.
(function () {
  try {
    var saved = localStorage.getItem('ordercast-theme');
    if (saved === 'light' || saved === 'dark') document.documentElement.dataset.theme = saved;
  } catch (e) {
    // Storage can be disabled; the system preference still applies.
  }
})();
