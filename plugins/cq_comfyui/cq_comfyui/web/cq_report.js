// cq's frontend extension: the Quantize node's report, drawn on the node.
//
// The node returns {"ui": {"text": [report]}}; the stock frontend hands that to
// the node's onExecuted but draws nothing for it. This adds a read-only text box
// (a DOM widget, not saved with the workflow) and fills it after each run.
import { app } from "../../scripts/app.js";

const NODE = "CqQuantizeModel";
const WIDGET = "cq_report";

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  const area = document.createElement("textarea");
  area.readOnly = true;
  area.placeholder = "The report shows here after the node runs.";
  area.className = "cq-report";
  Object.assign(area.style, { width: "100%", height: "100%", fontFamily: "monospace", fontSize: "11px",
                               whiteSpace: "pre-wrap", resize: "none", boxSizing: "border-box" });
  widget = node.addDOMWidget(WIDGET, "cq_report", area, {
    serialize: false,
    getValue: () => area.value,
    setValue: (value) => { area.value = value ?? ""; },
    getMinHeight: () => 180,
  });
  widget.serialize = false;
  return widget;
}

app.registerExtension({
  name: "cq.QuantizeReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      reportWidget(this);
      this.setSize?.([Math.max(this.size[0], 460), this.size[1]]);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      reportWidget(this).value = Array.isArray(text) ? text.join("\n") : (text ?? "");
      this.setDirtyCanvas?.(true, true);
    };
  },
});
