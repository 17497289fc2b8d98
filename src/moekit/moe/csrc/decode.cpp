/* A prepared decode-size MoE layer call, from Python into the native layer (router.c,
   moekit_topk_layer_packed) in one C++ call: moekit.moe.native.TopKLayer's `fast` object.

   A decode step runs every other layer between two calls of the same layer, and their weights flush
   the caches. Each step of checking that the prepared call still applies then misses on the
   interpreter's and torch's code and data: in Python, checking the guards (below) and building the
   call took 60-80 us of a 0.3-0.4 ms one-token layer call, as long as reading one small expert. Here
   the same checks read a few fields: the tensors' C++ structs, the dicts' entries.

   The guards: what the call was prepared for, as it was then (any one that no longer holds answers
   None, and the caller prepares the call again or takes torch's path):
     - same:  (dict, key, value) triples: dict[key] is value (None: the key was missing), e.g. the
              layer's submodules, parameters, training flags and settings, the config's count of
              field assignments, the library's switches;
     - sizes: (dict, size) pairs: e.g. the hook dicts, the layer's submodules;
     - pointers: (tensor, data pointer) pairs: the weights still live where the call reads them;
     - the input: a plain CPU float32 tensor, contiguous, of the prepared [T, D] shape;
     - autograd off, torch's thread count and this thread (the work memory is per thread).
   Called (`call(x)`), it also answers None unless it was prepared `direct` (the layer's own call does
   nothing but forward: no hooks, no compiled forward). `run(x)` runs it without the guards (the
   caller checked them: `guards_hold(x)`), the input still checked. Without this module (no C++
   compiler or torch headers), TopKLayer checks the same guards in Python and calls the kernel by ctypes.

   Shape legend: T tokens, D model dim. */

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

typedef int (*layer_fn)(const float *x, float *out, const int64_t *args);

PyObject *str_tensors, *str_copied; /* the routing object's slots: "_tensors", "_copied" */

struct Call {
    PyObject_HEAD
    vectorcallfunc vectorcall; /* the instance's call (tp_vectorcall_offset) */
    layer_fn fn;
    const int64_t *args;
    int64_t tokens, dim;
    int threads;
    unsigned long thread_id;
    int direct;          /* whether call(x) may run it */
    PyObject *same;      /* tuple of (dict, key, value) */
    PyObject *sizes;     /* tuple of (dict, size) */
    PyObject *tensors;   /* tuple of tensors */
    PyObject *pointers;  /* tuple of ints, one per tensor */
    PyObject *outputs;   /* list of [T, D] tensors, popped one per call */
    PyObject *refill;    /* () -> a list of new outputs */
    PyObject *routing;   /* the type of the call's routing object (native.KernelRouting) */
    PyObject *buffers;   /* the routing's buffers */
    PyObject *last;      /* weak reference to the last call's routing object, or NULL */
};

/* Whether x is what the call reads: a plain CPU float32 tensor [T, D], contiguous */
bool input_fits(Call *self, PyObject *x)
{
    if (!THPVariable_Check(x)) return false;
    const at::Tensor &t = THPVariable_Unpack(x);
    /* (a tensor of a tracer or transform, e.g. torch.export's fake or functional ones or vmap's
       batched ones, has one of these keys: its memory, if any, is not its values) */
    const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                      c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                      c10::DispatchKey::FuncTorchGradWrapper});
    return t.has_storage() && !t.key_set().has_any(traced) && t.device().is_cpu() && t.layout() == at::kStrided &&
           t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == self->tokens && t.size(1) == self->dim &&
           t.is_contiguous() && t.data_ptr() != nullptr;
}

/* 1 where every guard holds, 0 where one does not, -1 with an exception set */
int guards_hold(Call *self, PyObject *x)
{
    if (at::GradMode::is_enabled() || !input_fits(self, x)) return 0;
    if (at::get_num_threads() != self->threads || PyThread_get_thread_ident() != self->thread_id) return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->same); i++) {
        PyObject *triple = PyTuple_GET_ITEM(self->same, i);
        PyObject *value = PyDict_GetItemWithError(PyTuple_GET_ITEM(triple, 0), PyTuple_GET_ITEM(triple, 1));
        if (value == NULL && PyErr_Occurred()) return -1;
        if ((value ? value : Py_None) != PyTuple_GET_ITEM(triple, 2)) return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->sizes); i++) {
        PyObject *pair = PyTuple_GET_ITEM(self->sizes, i);
        if (PyDict_GET_SIZE(PyTuple_GET_ITEM(pair, 0)) != PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1))) return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->tensors); i++) {
        PyObject *obj = PyTuple_GET_ITEM(self->tensors, i);
        if (!THPVariable_Check(obj)) return 0;
        void *ptr = PyLong_AsVoidPtr(PyTuple_GET_ITEM(self->pointers, i));
        if (THPVariable_Unpack(obj).data_ptr() != ptr) return 0;
    }
    return 1;
}

/* -> (out [T, D], the call's routing), or None where a logit is not finite */
PyObject *run(Call *self, PyObject *x)
{
    if (!input_fits(self, x)) {
        PyErr_SetString(PyExc_ValueError, "the prepared call reads a plain CPU float32 tensor of its [T, D] shape");
        return NULL;
    }
    if (self->last) { /* the last call's routing, still referenced: moved out of the buffers first */
        PyObject *last = PyWeakref_GetObject(self->last);
        if (last != Py_None) {
            PyObject *done = PyObject_CallMethod(last, "tensors", NULL);
            if (!done) return NULL;
            Py_DECREF(done);
        }
        Py_CLEAR(self->last);
    }
    if (PyList_GET_SIZE(self->outputs) == 0) {
        PyObject *fresh = PyObject_CallNoArgs(self->refill);
        if (!fresh) return NULL;
        if (!PyList_Check(fresh) || PyList_GET_SIZE(fresh) == 0) {
            Py_DECREF(fresh);
            PyErr_SetString(PyExc_TypeError, "refill must give a non-empty list of output tensors");
            return NULL;
        }
        Py_SETREF(self->outputs, fresh);
    }
    const Py_ssize_t n = PyList_GET_SIZE(self->outputs);
    PyObject *out = PyList_GET_ITEM(self->outputs, n - 1);
    Py_INCREF(out);
    if (PyList_SetSlice(self->outputs, n - 1, n, NULL) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    const float *x_ptr = (const float *)THPVariable_Unpack(x).data_ptr();
    float *out_ptr = (float *)THPVariable_Unpack(out).data_ptr();
    const int status = self->fn(x_ptr, out_ptr, self->args);
    if (status == 1) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    if (status != 0) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_MemoryError, "the native expert kernel could not allocate its index arrays (%d)",
                            status);
    }
    /* the routing object, made as KernelRouting(buffers) would make it but without a Python frame:
       its two slots set on a new instance */
    PyTypeObject *routing_type = (PyTypeObject *)self->routing;
    PyObject *routing = routing_type->tp_alloc(routing_type, 0);
    if (!routing || PyObject_SetAttr(routing, str_tensors, self->buffers) < 0 ||
        PyObject_SetAttr(routing, str_copied, Py_False) < 0) {
        Py_XDECREF(routing);
        Py_DECREF(out);
        return NULL;
    }
    self->last = PyWeakref_NewRef(routing, NULL);
    if (!self->last) {
        Py_DECREF(out);
        Py_DECREF(routing);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, out, routing);
    Py_DECREF(out);
    Py_DECREF(routing);
    return result;
}

/* A C++ exception (torch's checks throw c10::Error) must not cross into Python: it becomes a
   RuntimeError. */
#define CATCH_CXX(fail)                                    \
    catch (const std::exception &err)                      \
    {                                                      \
        PyErr_SetString(PyExc_RuntimeError, err.what());   \
        return fail;                                       \
    }

PyObject *call_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a prepared call takes the input tensor alone");
        return NULL;
    }
    try {
        Call *call = (Call *)self;
        const int hold = call->direct ? guards_hold(call, args[0]) : 0;
        if (hold <= 0) {
            if (hold < 0) return NULL;
            Py_RETURN_NONE;
        }
        return run(call, args[0]);
    }
    CATCH_CXX(NULL)
}

PyObject *call_run(PyObject *self, PyObject *x)
{
    try {
        return run((Call *)self, x);
    }
    CATCH_CXX(NULL)
}

PyObject *call_guards_hold(PyObject *self, PyObject *x)
{
    try {
        const int hold = guards_hold((Call *)self, x);
        if (hold < 0) return NULL;
        return PyBool_FromLong(hold);
    }
    CATCH_CXX(NULL)
}

int call_traverse(Call *self, visitproc visit, void *arg)
{
    Py_VISIT(self->same);
    Py_VISIT(self->sizes);
    Py_VISIT(self->tensors);
    Py_VISIT(self->pointers);
    Py_VISIT(self->outputs);
    Py_VISIT(self->refill);
    Py_VISIT(self->routing);
    Py_VISIT(self->buffers);
    return 0;
}

int call_clear(Call *self)
{
    Py_CLEAR(self->same);
    Py_CLEAR(self->sizes);
    Py_CLEAR(self->tensors);
    Py_CLEAR(self->pointers);
    Py_CLEAR(self->outputs);
    Py_CLEAR(self->refill);
    Py_CLEAR(self->routing);
    Py_CLEAR(self->buffers);
    Py_CLEAR(self->last);
    return 0;
}

void call_dealloc(Call *self)
{
    PyObject_GC_UnTrack(self);
    call_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyMethodDef call_methods[] = {
    {"guards_hold", call_guards_hold, METH_O, "Whether the call applies to input x (its guards hold)."},
    {"run", call_run, METH_O, "-> (out, routing), or None where a logit is not finite; the guards unchecked."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject CallType = {PyVarObject_HEAD_INIT(NULL, 0)};

/* Call(fn, args, tokens, dim, threads, thread_id, direct, same, sizes, tensors, pointers, refill,
   routing, buffers): fn and args are addresses (ints), the rest as in struct Call. */
PyObject *call_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    unsigned long long fn, packed, thread_id;
    long long tokens, dim;
    int threads, direct;
    PyObject *same, *sizes, *tensors, *pointers, *refill, *routing, *buffers;
    if (!PyArg_ParseTuple(args, "KKLLiKpO!O!O!O!OOO!", &fn, &packed, &tokens, &dim, &threads, &thread_id,
                          &direct, &PyTuple_Type, &same, &PyTuple_Type, &sizes, &PyTuple_Type, &tensors, &PyTuple_Type,
                          &pointers, &refill, &routing, &PyTuple_Type, &buffers))
        return NULL;
    if (PyTuple_GET_SIZE(tensors) != PyTuple_GET_SIZE(pointers)) {
        PyErr_SetString(PyExc_ValueError, "tensors and pointers must be tuples of the same length");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(same); i++) {
        PyObject *triple = PyTuple_GET_ITEM(same, i);
        if (!PyTuple_Check(triple) || PyTuple_GET_SIZE(triple) != 3 || !PyDict_Check(PyTuple_GET_ITEM(triple, 0))) {
            PyErr_Format(PyExc_TypeError, "same[%zd] must be a (dict, key, value) tuple", i);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(sizes); i++) {
        PyObject *pair = PyTuple_GET_ITEM(sizes, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyDict_Check(PyTuple_GET_ITEM(pair, 0)) ||
            !PyLong_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_Format(PyExc_TypeError, "sizes[%zd] must be a (dict, int) tuple", i);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pointers); i++)
        if (!PyLong_Check(PyTuple_GET_ITEM(pointers, i))) {
            PyErr_Format(PyExc_TypeError, "pointers[%zd] must be an int", i);
            return NULL;
        }
    if (!PyType_Check(routing)) {
        PyErr_SetString(PyExc_TypeError, "routing must be the routing objects' type");
        return NULL;
    }
    Call *self = (Call *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->vectorcall = call_vectorcall;
    self->fn = (layer_fn)(uintptr_t)fn;
    self->args = (const int64_t *)(uintptr_t)packed;
    self->tokens = tokens;
    self->dim = dim;
    self->threads = threads;
    self->direct = direct;
    self->thread_id = (unsigned long)thread_id;
    PyObject **fields[] = {&self->same, &self->sizes, &self->tensors, &self->pointers,
                           &self->refill, &self->routing, &self->buffers};
    PyObject *values[] = {same, sizes, tensors, pointers, refill, routing, buffers};
    for (int i = 0; i < 7; i++) {
        Py_INCREF(values[i]);
        *fields[i] = values[i];
    }
    self->outputs = PyList_New(0);
    self->last = NULL;
    if (!self->outputs) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self; /* (tp_alloc tracked it for the garbage collector) */
}

PyModuleDef module = {PyModuleDef_HEAD_INIT, "moekit_decode", "moekit's prepared decode-size layer call", -1, NULL};

} // namespace

PyMODINIT_FUNC PyInit_moekit_decode(void)
{
    CallType.tp_name = "moekit_decode.Call";
    CallType.tp_basicsize = sizeof(Call);
    CallType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL;
    CallType.tp_doc = "A prepared decode-size MoE layer call (see decode.cpp).";
    CallType.tp_new = call_new;
    CallType.tp_dealloc = (destructor)call_dealloc;
    CallType.tp_free = PyObject_GC_Del;
    CallType.tp_traverse = (traverseproc)call_traverse;
    CallType.tp_clear = (inquiry)call_clear;
    CallType.tp_call = PyVectorcall_Call;
    CallType.tp_vectorcall_offset = offsetof(Call, vectorcall);
    CallType.tp_methods = call_methods;
    if (PyType_Ready(&CallType) < 0) return NULL;
    str_tensors = PyUnicode_InternFromString("_tensors");
    str_copied = PyUnicode_InternFromString("_copied");
    if (!str_tensors || !str_copied) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&CallType);
    if (PyModule_AddObject(m, "Call", (PyObject *)&CallType) < 0) {
        Py_DECREF(&CallType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
